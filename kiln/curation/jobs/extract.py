"""spark-submit entry for `kiln curate extract`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/extract.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "extract", *sys.argv[1:]]))
