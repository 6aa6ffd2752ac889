"""spark-submit entry for `kiln curate filter`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/filter.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "filter", *sys.argv[1:]]))
