"""Bulk copies into the shared memory of the other CTA of a cluster of two, by address.

``mapa`` maps one shared-memory address of this CTA to the same place in a peer CTA;
within a CTA's shared memory the map is a constant shift, so a kernel maps its base
once (``peer_shift``) and adds the shift to each local address it copies to, instead of
a ``mapa`` per copy."""

from typing import Optional

from cutlass import AddressSpace, Int32
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm, nvvm
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
def copy_bulk(cluster_address: Int32, source_address: Int32, size: int, mbar_cluster_address: Int32, *,
              loc: Optional[ir.Location] = None, ip: Optional[ir.InsertionPoint] = None) -> None:
    """``cp.async.bulk`` of ``size`` bytes (a multiple of 16, both addresses aligned to 16)
    of this CTA's shared memory at ``source_address`` to the shared::cluster address
    ``cluster_address``, by the copy engine, counted on the mbarrier at
    ``mbar_cluster_address`` (in the destination's CTA). The source's stores must be
    ordered before it by ``fence.proxy.async`` (and a barrier, where other threads made
    them)."""
    operands = [Int32(v).ir_value(loc=loc, ip=ip) for v in (cluster_address, source_address, size,
                                                            mbar_cluster_address)]
    llvm.inline_asm(None, operands,
                    "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];",
                    "r,r,r,r", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
                    loc=loc, ip=ip)
