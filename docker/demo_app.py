"""The compose demo's application: no credentials, only the sidecar's Unix socket.

Reads a secret and envelope-encrypts a document through the sidecar (sidecar/client.py),
decrypts it back, prints what happened, and exits 0 when everything worked.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from sidecar.client import SidecarClient, SidecarError

SOCKET = os.environ.get("SKM_SIDECAR_SOCKET", "/run/skm/sidecar.sock")
DEMO = Path(os.environ.get("SKM_DEMO_SHARED", "/shared")) / "demo.json"


def main() -> int:
    ids = json.loads(DEMO.read_text())
    client = SidecarClient(SOCKET, envelope_key_id=ids["envelope_key_id"])
    for attempt in range(30):        # the sidecar may still be opening its upstream pool
        try:
            password = client.get_secret(ids["secret_key_id"])
            break
        except (SidecarError, OSError) as e:
            if attempt == 29:
                print(f"demo-app: cannot read the secret through the sidecar: {e}", flush=True)
                return 1
            time.sleep(1)
    # Show that a value arrived, never the value itself.
    print(f"demo-app: read secret db-password through the sidecar ({len(password)} characters, "
          f"sha256 {hashlib.sha256(password.encode()).hexdigest()[:12]}…)", flush=True)
    document = b"quarterly numbers: " + b"42 " * 2000
    blob = client.envelope_encrypt(document)
    print(f"demo-app: envelope-encrypted {len(document)} bytes into {len(blob)} bytes "
          f"(data key wrapped by key {ids['envelope_key_id'][:8]}…)", flush=True)
    if client.envelope_decrypt(blob) != document:
        print("demo-app: the decrypted document differs", flush=True)
        return 1
    print("demo-app: decrypted it back: round trip OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
