"""The launch arguments' order is written once (``launch_args``): the host and the
compile step build the tuples by field name, and the fields follow the kernels'
``__call__`` parameters (``mBlockTable`` there is ``block_table`` here; the stream,
last, is the compiled function's own)."""

import inspect
import re

import pytest

from flashmla_cute.launch_args import CombineArgs, DecodeArgs, MergeArgs, MetadataArgs, SparseDecodeArgs


def host_name(kernel_parameter: str) -> str:
    """``mBlockTable`` -> ``block_table``; names without the ``m`` prefix stay."""
    if re.fullmatch(r"m[A-Z]\w*", kernel_parameter):
        return re.sub(r"(?<!^)(?=[A-Z])", "_", kernel_parameter[1:]).lower()
    return kernel_parameter


def kernel_parameters(kernel_class) -> list[str]:
    names = list(inspect.signature(kernel_class.__call__).parameters)
    assert names[0] == "self" and names[-1] == "stream"
    return [host_name(n) for n in names[1:-1]]


@pytest.mark.parametrize("module, class_name, args", [
    ("flashmla_cute.kernels.decode_sm90", "MlaDecodeSm90", DecodeArgs),
    ("flashmla_cute.kernels.sparse_decode_sm90", "SparseDecodeSm90", SparseDecodeArgs),
    ("flashmla_cute.kernels.combine", "MlaCombine", CombineArgs),
    ("flashmla_cute.kernels.merge_states", "MlaMergeStates", MergeArgs),
    ("flashmla_cute.kernels.metadata", "MlaMetadata", MetadataArgs),
])
def test_fields_follow_the_kernel_parameters(module, class_name, args):
    kernel_class = getattr(__import__(module, fromlist=[class_name]), class_name)
    assert list(args._fields) == kernel_parameters(kernel_class)


def test_compile_step_passes_the_tuples_and_a_stream():
    """The fake arguments a variant compiles against are the same tuple, then the stream."""
    from flashmla_cute import compile as compile_mod

    for variant, args in ((compile_mod.decode_variant("bfloat16", False), DecodeArgs),
                          (compile_mod.sparse_decode_variant(), SparseDecodeArgs),
                          (compile_mod.combine_variant("bfloat16"), CombineArgs),
                          (compile_mod.merge_variant("float32"), MergeArgs),
                          (compile_mod.metadata_variant(), MetadataArgs)):
        _, fake = variant.build()
        assert len(fake) == len(args._fields) + 1
