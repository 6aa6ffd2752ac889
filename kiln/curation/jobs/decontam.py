"""spark-submit entry for `kiln curate decontam`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/decontam.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "decontam", *sys.argv[1:]]))
