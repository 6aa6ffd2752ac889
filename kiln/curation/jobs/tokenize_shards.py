"""spark-submit entry for `kiln curate tokenize`: the same code and options.
(Not named tokenize.py: spark-submit puts this directory first on sys.path, where that
name would shadow the standard library's tokenize module.)

    spark-submit --master 'local[2]' kiln/curation/jobs/tokenize_shards.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "tokenize", *sys.argv[1:]]))
