"""Plot bench/gpu_server.py results: latency and playback gaps against concurrent sessions.

    python bench/plot_gpu_server.py bench/results/h200-2026-12-02/gpu_server.jsonl \
        -o bench/gpu_server_h200.png          (needs matplotlib: pip install matplotlib)

Runs with the same N are told apart by their order (the first after start-up is cold).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", help="results.jsonl written by bench/gpu_server.py")
    ap.add_argument("-o", "--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="stepaudio serve, random weights at published shapes, "
                    "one NVIDIA H200")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line]
    seen: set[int] = set()
    warm = []
    for r in rows:  # keep the last run of each N (a repeated N=1 is the warm one)
        if r["sessions"] in seen:
            warm = [w for w in warm if w["sessions"] != r["sessions"]]
        seen.add(r["sessions"])
        warm.append(r)
    warm.sort(key=lambda r: r["sessions"])
    n = [r["sessions"] for r in warm]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("latency_ms", "end of speech → first audio"),
                       ("tts_request_to_first_audio_ms", "TTS request → first audio")):
        for q, style in (("p50", "-o"), ("p90", "--o")):
            a.plot(n, [r[key][q] for r in warm], style, label=f"{label} {q}")
    silence = warm[0]["silence_wait_ms"]["p50"]
    a.axhline(silence, color="grey", lw=0.8, ls=":", label=f"end-of-turn silence wait ({silence:.0f})")
    a.set_xscale("log", base=2)
    a.set_xticks(n, [str(x) for x in n])
    a.set_xlabel("concurrent sessions")
    a.set_ylabel("ms")
    a.legend(fontsize=8)
    a.set_title("latency")
    share = [100 * r["playback"]["prebuffer_0ms"]["replies_with_underrun"]
             / max(1, r["playback"]["prebuffer_0ms"]["replies"]) for r in warm]
    silent = [r["playback"]["prebuffer_0ms"]["underrun_ms"] / 1000.0 for r in warm]
    b.bar([str(x) for x in n], share, color="tab:red", alpha=0.6, label="replies with a gap (%)")
    b.set_ylabel("% of replies")
    b.set_xlabel("concurrent sessions")
    c = b.twinx()
    c.plot([str(x) for x in n], silent, "k-o", label="silence heard, s (all replies)")
    c.plot([str(x) for x in n], [r.get("gpu_busy_pct") or 0 for r in warm], "b--s",
           label="GPU busy %")
    c.set_ylabel("s / %")
    b.set_title("playback gaps (no jitter buffer) and GPU busy share")
    h1, l1 = b.get_legend_handles_labels()
    h2, l2 = c.get_legend_handles_labels()
    b.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
