"""`vl2 extract`'s schema machinery on JSONSchemaBench (guidance-ai/jsonschemabench; "Generating Structured Outputs
from Language Models: Benchmark and Studies", 2025), against raw llguidance compiling the same original schemas.

    python benchmarks/jsonschemabench.py [--smoke] [--markdown]   # the committed sample: 15 from each subset
    python benchmarks/jsonschemabench.py sample DATA_DIR      # rebuild the sample from a checkout's data/ folder

Per subset, at each answer budget (400, 1024, 2048 tokens): the share of schemas `vl2 extract` accepts (its check
before any model loads), and of all schemas the share whose answer is valid under the ORIGINAL schema (jsonschema,
formats checked); flagged failures (cut, or not valid: no data, a flag); invalid data passed as valid (must be 0);
data from a cut answer (silent truncation, must be 0). Answers come from random walks through each grammar on the
tiny checkpoint's vocabulary, without a model: `uniform` takes any allowed token (what random weights amount to),
`terse` half the time ends a value when it may (a model that answers briefly). Each walk may run to the room a
4096-token context leaves after a 1024-token page prompt (3072 tokens), what vl2 re-reads a cut answer with: an
answer longer than the budget counts as `reread` (complete after the re-read), one longer than the room as flagged.
"""

from __future__ import annotations

import collections
import gzip
import json
import random
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).parent / "data" / "jsonschemabench-sample.jsonl.gz"
SUBSETS = ("Github_trivial", "Github_easy", "Github_medium", "Github_hard", "Github_ultra", "Glaiveai2K",
           "JsonSchemaStore", "Kubernetes", "Snowplow", "WashingtonPost")
PER_SUBSET, SEED = 15, 20
BUDGETS = (400, 1024, 2048)
ROOM = 3072
TINY = Path(__file__).parent.parent / "tests" / "data" / "parity" / "ckpt" / "tiny"


def build_sample(data_dir: Path) -> None:
    rng = random.Random(SEED)
    rows = []
    for subset in sorted(SUBSETS):
        names = sorted(p.name for p in (data_dir / subset).iterdir())
        for name in rng.sample(names, PER_SUBSET):
            rows.append({"subset": subset, "name": name, "schema": json.loads((data_dir / subset / name).read_text())})
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
    SAMPLE.write_bytes(gzip.compress(text.encode(), 9, mtime=0))


def raw_llguidance(schema: dict) -> bool:
    import llguidance

    from vl2cli.engine.grammar import JSON_OPTIONS
    try:
        compiled = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        failed, _ = llguidance.LLMatcher.validate_grammar_with_warnings(compiled)
        return not failed
    except Exception:
        return False


def valid(schema: dict, data: object) -> bool:
    import jsonschema
    cls = jsonschema.validators.validator_for(schema)
    try:
        return not any(True for _ in cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(data))
    except Exception:
        return False


def run(smoke: bool = False) -> list[dict]:
    from testkit import random_walk

    from vl2cli.engine.grammar import GrammarError, grammar_tokenizer
    from vl2cli.extract import schema_grammar, settle
    rows = [json.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).decode().splitlines()]
    if smoke:
        rows = rows[::PER_SUBSET][:10]
    tokenizer = grammar_tokenizer((TINY / "tokenizer.json").read_text(), 576, 1)
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    refusals: collections.Counter = collections.Counter()
    started = time.perf_counter()
    for n, row in enumerate(rows):
        schema, subset = row["schema"], row["subset"]
        schema_json = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        total = counts[(subset, "all")]
        total["schemas"] += 1
        total["raw_llguidance"] += raw_llguidance(schema)
        accepted = set()
        for budget in BUDGETS:
            try:
                schema_grammar(schema_json, budget)  # the CLI's check before the model loads
                total[f"accepted@{budget}"] += 1
                accepted.add(budget)
            except GrammarError as exc:
                if budget == BUDGETS[-1]:
                    refusals[" ".join(str(exc).split())[:90]] += 1
        try:
            grammar = schema_grammar(schema_json, ROOM)
        except GrammarError:
            continue
        total["relaxed"] += bool(grammar.relaxed)
        for walker, terse in (("uniform", 0.0), ("terse", 0.5)):
            ids, complete = random_walk(grammar, tokenizer, random.Random(f"{row['name']}/{walker}"), ROOM, terse)
            answer = tokenizer.decode_str(ids)
            fields, flags = settle(answer, complete, grammar, schema_json)
            data = fields["data"]
            c = counts[(subset, walker)]
            for budget in sorted(accepted):
                if data is not None and not valid(schema, data):
                    c[f"invalid@{budget}"] += 1
                elif data is not None and not complete:
                    c[f"silent@{budget}"] += 1
                elif data is not None:
                    c[f"valid@{budget}"] += 1
                    c[f"reread@{budget}"] += len(ids) + 1 > budget
                else:
                    c[f"flagged@{budget}"] += 1
            c["bound_reached"] += "bound_reached" in flags
            c["schema_mismatch"] += "schema_mismatch" in flags
        print(f"{n + 1}/{len(rows)} {subset}/{row['name']} {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return _table(counts, refusals)


def _table(counts: dict, refusals: collections.Counter) -> list[dict]:
    """One row per subset (and the total): shares of all its schemas, counts of walks."""
    out: list[dict] = []
    for subset in [*SUBSETS, "total"]:
        merged: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for (s, kind), c in counts.items():
            if s == subset or subset == "total":
                merged[kind].update(c)
        total = merged["all"]
        if not total["schemas"]:
            continue
        n = total["schemas"]
        row: dict = {"subset": subset, "schemas": n, "raw_llguidance": round(total["raw_llguidance"] / n, 3),
                     "relaxed": total["relaxed"]}
        for budget in BUDGETS:
            row[f"accepted@{budget}"] = round(total[f"accepted@{budget}"] / n, 3)
            for walker in ("uniform", "terse"):
                c = merged[walker]
                row[f"valid@{budget}"] = row.get(f"valid@{budget}", {})
                row[f"valid@{budget}"][walker] = round(c[f"valid@{budget}"] / n, 3)
                for kind in ("reread", "flagged", "invalid", "silent"):
                    row.setdefault(f"{kind}@{budget}", {})[walker] = c[f"{kind}@{budget}"]
        for walker in ("uniform", "terse"):
            row.setdefault("bound_reached", {})[walker] = merged[walker]["bound_reached"]
            row.setdefault("schema_mismatch", {})[walker] = merged[walker]["schema_mismatch"]
        out.append(row)
    out.append({"refusals_at_2048": dict(refusals.most_common())})
    return out


def markdown(rows: list[dict]) -> str:
    """The table for RESULTS.md: accepted, and valid of all (uniform / terse walks), per budget."""
    head = "| subset | n | raw llguidance | " + " | ".join(
        f"accepted / valid @{b}" for b in BUDGETS) + " | flagged @2048 | invalid | silent |"
    lines = [head, "|" + "---|" * (3 + len(BUDGETS) + 3)]
    for r in rows:
        if "subset" not in r:
            continue
        cells = [f"{r[f'accepted@{b}']:.0%} / {r[f'valid@{b}']['uniform']:.0%}, {r[f'valid@{b}']['terse']:.0%}"
                 for b in BUDGETS]
        invalid = sum(r[f"invalid@{b}"][w] for b in BUDGETS for w in ("uniform", "terse"))
        silent = sum(r[f"silent@{b}"][w] for b in BUDGETS for w in ("uniform", "terse"))
        flagged = f"{r['flagged@2048']['uniform']}, {r['flagged@2048']['terse']}"
        lines.append(f"| {r['subset']} | {r['schemas']} | {r['raw_llguidance']:.0%} | " + " | ".join(cells)
                     + f" | {flagged} | {invalid} | {silent} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["sample"]:
        build_sample(Path(sys.argv[2]))
    else:
        results = run(smoke="--smoke" in sys.argv)
        for result in results:
            print(json.dumps(result), flush=True)
        if "--markdown" in sys.argv:
            print(markdown(results))
