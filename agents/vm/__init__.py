"""The guest runtime: RAM blocks on memfd, the guest process and its workloads,
devices, and the userfaultfd / pagemap bindings.  Knows nothing about networks."""
