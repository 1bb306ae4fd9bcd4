"""``python -m qlora_dist ...`` (what ``accelerate launch -m qlora_dist train RUN.yaml`` runs on each process)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
