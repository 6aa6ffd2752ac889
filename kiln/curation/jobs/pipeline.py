"""spark-submit entry for `kiln curate pipeline`: the same code and options.

    spark-submit --master 'local[2]' kiln/curation/jobs/pipeline.py --help
"""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", "pipeline", *sys.argv[1:]]))
