"""Ray Job entrypoint for scoring on a cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/score.py s3://bucket/manifest.parquet s3://bucket/out/ --device cuda

Takes exactly the arguments of `cxrage score`; inside a Ray job, RAY_ADDRESS is set, so the pipeline joins
the cluster instead of starting an embedded Ray. Rerunning the same submission resumes an interrupted job.
"""

import sys

from cxrage_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
