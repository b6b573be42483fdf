"""Snapshots: save, restore, reset and fork a guest; inspect saved state offline.

- ``elfcore``: the ELF64 ET_CORE container (writer + hardened reader), pure format.
- ``format``: pyvmm's notes (vCPU state as KVM hands it out, JSON metadata), pure data.
- ``vcpu``: the vCPU's whole state in and out through KVM ioctls.
- ``save``: non-zero page runs of guest RAM, atomic file writing.
- ``machine``: a ``Vm`` to a file and a file to a ``Vm`` (kernel/RAM checks).
"""
