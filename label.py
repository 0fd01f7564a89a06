"""The labeling page: people score and rank K replies per prompt, and their answers become reward-model data.

    python label.py --out_dir=out-sft --prompts=world --k=4 --labels=labels.jsonl    # open http://127.0.0.1:8001/
    python label.py --out_dir=out-sft --prompts=my_prompts.jsonl --labels=mine.jsonl
    python label.py --report=True --labels=labels.jsonl   # labelers' agreement (and with the gold annotator)
    python train_rm.py --dataset=labels.jsonl           # a reward model trained on what people said
The replies are sampled once (seeded) and kept beside the labels (labels.items.json), so every labeler sees the same
ones; each answer is written to the labels file at once (atomically), and a labeler who comes back, after a closed
browser or a restarted server, continues at the first item they have not labeled. The library code is
nanollm/labeling.py, the page nanollm/web/label.html; docs/labeling.md explains the record format and the report.
"""
import sys

from nanollm.configurator import UserError, check_ranges, configure
from nanollm.distributed import pick_device
from nanollm.labeling import LabelServer, LabelStore, items_path, labeling_prompts, prepare_items, report_labels

out_dir = "out-sft"  # the model whose replies are labeled (an SFT out_dir: it knows the chat template)
prompts = "world"  # 'world' (the world's training questions) or a .jsonl/.json prompts file ({"prompt"} / {"messages"})
n_prompts = 20  # with prompts='world': how many questions
k = 4  # replies per prompt (InstructGPT showed labelers 4 to 9); 2 = pick the better of two
labels = "labels.jsonl"  # the answers; the sampled replies are kept beside it in <name>.items.json
max_new_tokens = 48  # longest reply
temperature = 1.0  # pure sampling, so the K replies differ
seed = 0  # the sampled replies (and the world's questions)
world_seed = 0  # the world of prompts='world' and of the gold annotator in the report
host = "127.0.0.1"  # 0.0.0.0 lets other machines in (no authentication: a local network only)
port = 8001
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'mps': where the replies are sampled
report = False  # True: print the agreement report of the labels file and exit
configure(globals(), sys.argv[1:])
check_ranges(globals(), positive=("n_prompts", "max_new_tokens", "temperature"))
if k < 2:
    raise UserError(f"k={k}: at least 2 replies per prompt are needed to rank them")

if report:
    print(report_labels(labels, world_seed))
    raise SystemExit(0)
asked = labeling_prompts(prompts, n_prompts, seed, world_seed)  # a bad prompts file stops here, naming file:line
items = prepare_items(out_dir, asked, k, items_path(labels), max_new_tokens, temperature, seed, pick_device(device))
store = LabelStore(labels, items)  # the answers given so far
server = LabelServer((host, port), store)
print(f"[nanollm] {len(items)} prompts x {k} replies from {out_dir} (kept in {items_path(labels)}); answers go to "
      f"{labels} ({len(store.records)} so far). Open http://{host}:{server.server_address[1]}/ (Ctrl-C stops)",
      flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    print("\n[nanollm] stopped; every answer given is in", labels)
finally:
    server.server_close()
