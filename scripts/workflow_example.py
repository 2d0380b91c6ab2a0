"""A small scientific workflow with Parsl: ask, analyse, aggregate.

Each topic becomes a question to the model (a tpm-fed Parsl app, routed
through the broker); an ordinary Parsl app analyses each answer as soon as
it arrives (does it stay on topic? how long is it?); a last app aggregates
them. The questions are in flight together, so they batch on the replica.

Usage:
    python scripts/workflow_example.py [--topics "The cell" "The river" ...]
"""

from __future__ import annotations

import argparse
import json

import parsl
from parsl import python_app
from parsl.config import Config
from parsl.executors import ThreadPoolExecutor

from tpm_fed.parsl import generate, tpm_executor
from tpm_fed.protocol.requests import GenerationRequest

TOPICS = ["The cell", "The river", "The glacier", "The telescope", "The enzyme", "The neuron"]


@python_app(executors=["analysis"])
def analyse(topic: str, result) -> dict:
    text = result.texts[0]
    subject = topic.split()[-1].lower()
    return {
        "topic": topic,
        "answer": text.strip(),
        "words": len(text.split()),
        "mentions_subject_again": subject in text.lower(),
        "version": result.version,
        "charged_su": result.charge.charged_su if result.charge else 0.0,
    }


@python_app(executors=["analysis"])
def aggregate(*rows: dict) -> dict:
    return {
        "answers": len(rows),
        "mean_words": sum(r["words"] for r in rows) / len(rows),
        "versions": sorted({r["version"] for r in rows}),
        "total_su": round(sum(r["charged_su"] for r in rows), 6),
        "rows": list(rows),
    }


def run(topics: list[str], model: str | None = None, max_new_tokens: int = 24) -> dict:
    """The workflow, inside an already loaded Parsl config."""
    from tpm_fed.parsl import _shared_client

    model = model or str(_shared_client().default_model())
    answers = [generate(GenerationRequest.create(t, model, max_new_tokens=max_new_tokens)) for t in topics]
    analyses = [analyse(topic, answer) for topic, answer in zip(topics, answers, strict=True)]
    return aggregate(*analyses).result()


def config() -> Config:
    return Config(executors=[tpm_executor(), ThreadPoolExecutor(label="analysis", max_threads=4)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topics", nargs="+", default=TOPICS)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    with parsl.load(config()):
        summary = run(args.topics, args.model)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
