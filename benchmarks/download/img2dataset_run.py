"""img2dataset 1.47 at Easel's settings: no resizing, no re-encoding, files output.

Runs inside img2dataset's own venv. Usage: python img2dataset_run.py URLS.txt OUT_DIR PROCESSES THREADS
"""

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network

from img2dataset import download

if __name__ == "__main__":  # img2dataset's spawn pool hangs silently without this guard
    url_list, out, processes, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    download(
        url_list=url_list,
        input_format="txt",
        output_folder=out,
        output_format="files",
        processes_count=processes,
        thread_count=threads,
        resize_mode="no",
        disable_all_reencoding=True,  # keep the bytes as served, as Easel does
        compute_hash="sha256",
        number_sample_per_shard=1000,
        timeout=20,
        retries=0,
        disallowed_header_directives=[],
        enable_wandb=False,
        distributor="multiprocessing",
    )
