"""A docker-credential-helpers program for tests of `pull`'s credential lookup."""
from __future__ import annotations

from pathlib import Path


def write_helper(bin_dir: Path, name: str, host: str, log: Path) -> None:
    """A docker-credential-helpers protocol helper: the server URL on stdin, JSON on stdout."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    helper = bin_dir / f"docker-credential-{name}"
    helper.write_text(f"""#!/bin/sh
read server
echo "$1 $server" >> {log}
if [ "$1" = get ] && [ "$server" = "{host}" ]; then
  echo '{{"ServerURL": "{host}", "Username": "alice", "Secret": "s3cret"}}'
  exit 0
fi
echo "credentials not found in native keychain"
exit 1
""")
    helper.chmod(0o755)
