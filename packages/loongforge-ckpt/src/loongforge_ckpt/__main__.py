"""``python -m loongforge_ckpt NAME ARGS...``: the converters without the ``loongforge`` CLI."""

import sys

from loongforge_ckpt import hf_to_mcore, mcore_to_hf

CONVERTERS = {"hf-to-mcore": hf_to_mcore.main, "mcore-to-hf": mcore_to_hf.main}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in CONVERTERS:
        print(f"usage: python -m loongforge_ckpt {{{','.join(CONVERTERS)}}} ARGS...", file=sys.stderr)
        return 2
    return CONVERTERS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
