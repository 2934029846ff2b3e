"""A faithful re-creation of the user's guide's downloader: one requests.Session, one URL at a time.

(The guide also switches TLS verification off; the benchmark server is plain HTTP, so that
makes no difference here, and it is a habit Easel does not copy.)
Usage: python guide_loop.py URLS.csv OUT_DIR
"""

import csv
import os
import sys

import requests


def parse_csv(path: str, url_prefix: str, save_root_path: str) -> None:
    cnt = 0
    s = requests.Session()
    s.verify = False
    with open(path, encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            raw_img_url = row["poster_path"]
            img_url = url_prefix + raw_img_url
            if raw_img_url == "":
                continue
            try:
                img_file = s.get(img_url, verify=False)
            except Exception as e:
                print(repr(e))
                continue
            if img_file.status_code == 200:
                img_name = raw_img_url.split("/")[-1]
                save_path = os.path.join(save_root_path, img_name)
                with open(save_path, "wb") as img:
                    img.write(img_file.content)
                cnt += 1
    print(cnt, "saved")


if __name__ == "__main__":
    csv_file, out = sys.argv[1], sys.argv[2]
    prefix = sys.argv[3] if len(sys.argv) > 3 else ""
    os.makedirs(out, exist_ok=True)
    parse_csv(csv_file, prefix, out)
