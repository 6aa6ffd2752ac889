"""spark-submit entry for `kiln curate langid`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/langid.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "langid", *sys.argv[1:]]))
