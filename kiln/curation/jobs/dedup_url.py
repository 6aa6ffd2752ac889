"""spark-submit entry for `kiln curate dedup-url`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/dedup_url.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "dedup-url", *sys.argv[1:]]))
