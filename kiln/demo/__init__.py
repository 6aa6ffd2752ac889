"""The demo corpus: a deterministic Common-Crawl-like sample WARC and labelled sets.

The sample's HTML pages wrap *real* text found on the build machine (Python's
standard library, gettext catalogues, ``/usr/share/doc`` manuals) in realistic
site chrome (navigation, sidebar, footer, cookie banner), and plant duplicates,
spam, logs, legacy encodings and broken records, so that every curation stage
has genuine work to do.  ``build_labels`` writes the demo classifiers' training
sets and the evaluation sets to decontaminate against, from the same generators
with another seed.

* ``sources``: the text found on this machine;
* ``pages``, ``maths``: the page families, before rendering;
* ``render``: HTML in one of three site layouts;
* ``crawl``: URLs, capture dates and order, the records of each capture;
* ``warc``: writing a list of records to a WARC;
* ``sample``, ``labels``: the two builders.

Everything is derived from ``random.Random`` instances seeded from ``seed``
and a fixed name, file listings are sorted and WARC dates / record ids are
generated, so two builds with the same seed are byte-identical.

Usage::

    python -m kiln.demo --out data/sample.warc.gz [--seed 0] [--labels data/labels]
"""

from kiln.demo.labels import build_labels
from kiln.demo.sample import build_sample

__all__ = ["build_labels", "build_sample"]
