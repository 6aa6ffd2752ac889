"""spark-submit entry for `kiln curate quality`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/quality.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "quality", *sys.argv[1:]]))
