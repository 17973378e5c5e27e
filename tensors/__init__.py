"""tensors: the data plane.

* `tensors.packed.PackedBatch`: variable-length sequences packed into 1D tensors (no padding);
* `tensors.wire`: msgpack header + raw buffers, encoded and decoded without copying;
* `tensors.allocator.allocate_micro_batches`: balanced micro-batches under a token budget;
* `tensors.channels`: moving payloads by locality (local, shm, zmq);
* `tensors.errors`: WireError, TransferError, AllocationError, BatchError.
Imports nothing of ours outside this package; the GPU channels import CuPy only when opened.
"""

from tensors.allocator import allocate_micro_batches
from tensors.errors import AllocationError, BatchError, TensorsError, TransferError, WireError
from tensors.packed import PackedBatch

__all__ = [
    "PackedBatch", "allocate_micro_batches",
    "TensorsError", "WireError", "TransferError", "AllocationError", "BatchError",
]  # fmt: skip
