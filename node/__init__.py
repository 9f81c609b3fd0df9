"""mr2nst.node: everything DICOM and service, in rooms.

``cli`` is the composition root; ``service`` the running node (SCP, workers, forwarder,
routing, spool); ``ledger`` its durable record; ``dicom`` pixel I/O, derived series and the
SCU; ``methods`` the normalization methods; ``lab`` the offline tools (evaluation,
training, benchmarks, phantoms, demo), which only ``cli`` imports.
"""
