"""spark-submit entry for `kiln curate scorer`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/scorer.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "scorer", *sys.argv[1:]]))
