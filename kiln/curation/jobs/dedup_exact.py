"""spark-submit entry for `kiln curate dedup-exact`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/dedup_exact.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "dedup-exact", *sys.argv[1:]]))
