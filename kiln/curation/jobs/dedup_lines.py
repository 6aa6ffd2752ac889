"""spark-submit entry for `kiln curate dedup-lines`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/dedup_lines.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "dedup-lines", *sys.argv[1:]]))
