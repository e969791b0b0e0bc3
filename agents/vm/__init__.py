"""The guest runtime: RAM blocks on memfd, the guest process and its workloads,
devices, and the userfaultfd / pagemap bindings.  Knows nothing about networks.

Map: ramblock (memfd blocks, zero-page mask), guest (the agent's trio handle)
and guest_main (the guest process), orphans (guests that outlive their agent:
adoption socket, on-disk record, find_orphans), workloads, fill, devices, dirty (PAGEMAP_SCAN
dirty log), postcopy (UffdPlacer), verify (digests, counter check), uffd (raw
bindings), ctl (the private control protocol), errors.
"""
