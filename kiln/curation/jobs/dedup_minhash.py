"""spark-submit entry for `kiln curate dedup-minhash`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/dedup_minhash.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "dedup-minhash", *sys.argv[1:]]))
