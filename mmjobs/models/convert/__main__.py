"""`python -m mmjobs.models.convert {llava,safetensors} ... --to URI` (see the package docstring).

Local paths only for the inputs (use the `convert` stage for store inputs); the output is any
store URI and is committed with a manifest. A refused or broken checkpoint is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence

from mmjobs.models.convert import (
    ConversionError,
    GenerationConfigError,
    commit_converted,
    convert_original_llava,
    convert_to_safetensors,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, convert, commit; print the summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m mmjobs.models.convert",
                                     description="Convert pickled / original-layout checkpoints "
                                     "to safetensors transformers models.")
    sub = parser.add_subparsers(dest="kind", required=True)
    llava = sub.add_parser("llava", help="original LLaVA (llava_llama or vicuna + CLIP + "
                           "mm_projector.bin) -> LlavaForConditionalGeneration")
    llava.add_argument("--llm", required=True, help="llava_llama or plain Llama directory")
    llava.add_argument("--vision-tower", required=True, help="CLIP directory")
    llava.add_argument("--projector", help="mm_projector.bin (for a plain Llama)")
    llava.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                       help="cast every tensor (default: keep each tensor's dtype)")
    plain = sub.add_parser("safetensors", help="pickled shards -> safetensors, same names")
    plain.add_argument("source")
    for p in (llava, plain):
        p.add_argument("--to", required=True, help="output URI (local path or s3://)")
        p.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    if args.kind == "llava":
        convert = functools.partial(convert_original_llava, args.llm, args.vision_tower,
                                    projector=args.projector, dtype=args.dtype,
                                    max_shard_size=args.max_shard_size)
    else:
        convert = functools.partial(convert_to_safetensors, args.source,
                                    max_shard_size=args.max_shard_size)
    try:
        summary = commit_converted(lambda out: convert(out_dir=out), args.to)
    except (ConversionError, GenerationConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
