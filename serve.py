"""Serve a chat model over HTTP: an OpenAI-style API and a chat page in the browser.

    python serve.py                                   # out-sft/ on http://127.0.0.1:8000 (open it in a browser)
    python serve.py --out_dir=out-sft --host=0.0.0.0 --port=8080 --max_batch=16
    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Where does Ada live?"}], "temperature": 0}'
Endpoints: POST /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models,
GET /health, GET / (the chat page, nanollm/web/chat.html). The library code is nanollm/serving.py.
POSTs must be Content-Type: application/json, and the Host header an IP address, localhost or one of allowed_hosts
(a web page from another site cannot drive the server); no CORS headers are sent.
"""
import os
import sys

import torch

from nanollm.configurator import UserError, configure, reject_renamed
from nanollm.distributed import pick_device
from nanollm.loader import load_model
from nanollm.serving import Engine, make_server
from nanollm.tokenizer import Tokenizer

out_dir = "out-sft"  # folder holding ckpt.pt and tokenizer.model (an SFT checkpoint: it knows the chat template)
model_name = ""  # the id reported by /v1/models and in answers; '' = the checkpoint folder's name
host = "127.0.0.1"  # 0.0.0.0 to accept other machines (there is no authentication)
port = 8000
device = "auto"  # auto | cpu | cuda | mps
max_batch = 8  # requests decoded together in one batch
default_max_tokens = 128  # answer length when a request gives no max_tokens (always within the context)
truncate_history = True  # drop the oldest turns of a conversation longer than the context (False: a 400 error)
max_body_bytes = 1 << 20  # larger request bodies get 413
max_queue = 256  # waiting requests beyond this get 503
read_timeout = 60  # seconds a client may stall in the middle of its request (then 408)
allowed_hosts = ""  # comma-separated Host names accepted besides IP addresses and localhost (DNS rebinding guard)
seed = 1337  # for requests without their own seed
quiet = False  # True: no line per request on stderr
reject_renamed(sys.argv[1:], {"ckpt_dir": "out_dir"})
configure(globals(), sys.argv[1:])
if read_timeout <= 0:
    raise ValueError(f"read_timeout={read_timeout}: must be > 0 seconds")

torch.manual_seed(seed)
device = pick_device(device)
model, tokenizer, _, _ = load_model(out_dir, device)
if not isinstance(tokenizer, Tokenizer):
    raise UserError(f"out_dir={out_dir!r}: no tokenizer.model beside the model (the chat template needs it)")
name = model_name or os.path.basename(os.path.abspath(out_dir))
engine = Engine(model, tokenizer, name, max_batch=max_batch, default_max_tokens=default_max_tokens,
                truncate_history=truncate_history, max_queue=max_queue)
server = make_server(engine, host, port, max_body_bytes=max_body_bytes, quiet=quiet, read_timeout=read_timeout,
                     allowed_hosts=[host_name.strip() for host_name in allowed_hosts.split(",") if host_name.strip()])
print(f"[nanollm] serving {name} ({model.num_parameters() / 1e6:.2f} M parameters, context "
      f"{model.config.block_size} tokens) on {device}: open http://{host}:{server.server_address[1]}/ "
      f"(Ctrl-C stops)", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    print("\n[nanollm] stopped")
finally:
    server.server_close()
    engine.close()
