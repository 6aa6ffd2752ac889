"""spark-submit entry for `kiln curate domain`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/domain.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "domain", *sys.argv[1:]]))
