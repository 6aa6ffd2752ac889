"""The contracts between kiln's parts (DESIGN.md), as small pure modules that the writer
and the reader of each contract both import; nothing here needs Spark or torch.

    schema    the document table: column names and Arrow schemas (contract 1)
    stats     a stage's accounting: in == kept + dropped by reason, and the funnel (contract 2)
    shards    token shards, their index and availability.json (contract 3)
    mixture   the mixture file (contract 4)
    runs      the runs table's columns and the weights' sum tolerance (contract 5)
    probe     a probe's results.csv and verdict.json (contract 7)
    checkpoint  the names and metadata files of a training run (contract 8)
    hashing   the content hash that shards and fingerprints record
"""
