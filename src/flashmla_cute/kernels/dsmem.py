"""Stores into the shared memory of the other CTA of a cluster of two, by address.

``mapa`` maps one shared-memory address of this CTA to the same place in a peer CTA;
within a CTA's shared memory the map is a constant shift, so a kernel maps its base
once (``peer_shift``) and adds the shift to each local address it stores to, instead of
a ``mapa`` per store."""

from typing import Optional

from cutlass import AddressSpace, Int32
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm, nvvm, vector
from cutlass.cutlass_dsl import T, dsl_user_op


@dsl_user_op
def peer_shift(smem_address: Int32, peer_rank: Int32, *, loc: Optional[ir.Location] = None,
               ip: Optional[ir.InsertionPoint] = None) -> Int32:
    """What to add to an address of this CTA's shared memory to get the same place in
    the shared memory of CTA ``peer_rank`` of the cluster (a shared::cluster address)."""
    local = llvm.inttoptr(llvm.PointerType.get(AddressSpace.smem), Int32(smem_address).ir_value(loc=loc, ip=ip),
                          loc=loc, ip=ip)
    remote = nvvm.mapa(llvm.PointerType.get(AddressSpace.dsmem), local, Int32(peer_rank).ir_value(loc=loc, ip=ip),
                       loc=loc, ip=ip)
    return Int32(llvm.ptrtoint(T.i32(), remote, loc=loc, ip=ip)) - smem_address


@dsl_user_op
def store_async(cluster_address: Int32, words, mbar_cluster_address: Int32, *,
                loc: Optional[ir.Location] = None, ip: Optional[ir.InsertionPoint] = None) -> None:
    """``st.async`` of one or four 32-bit ``words`` (4 or 16 bytes, aligned to their
    size) to a shared::cluster address, counted (their bytes) on the mbarrier at
    ``mbar_cluster_address`` in the same CTA as the destination."""
    assert len(words) in (1, 4), f"st.async stores 1 or 4 words, not {len(words)}"
    dsmem = llvm.PointerType.get(AddressSpace.dsmem)
    dst = llvm.inttoptr(dsmem, Int32(cluster_address).ir_value(loc=loc, ip=ip), loc=loc, ip=ip)
    mbar = llvm.inttoptr(dsmem, Int32(mbar_cluster_address).ir_value(loc=loc, ip=ip), loc=loc, ip=ip)
    values = [Int32(w).ir_value(loc=loc, ip=ip) for w in words]
    if len(values) == 4:
        value = vector.from_elements(ir.VectorType.get([4], Int32.mlir_type), values, loc=loc, ip=ip)
    else:
        value = values[0]
    nvvm.store_async(dst, value, mbar, loc=loc, ip=ip)
