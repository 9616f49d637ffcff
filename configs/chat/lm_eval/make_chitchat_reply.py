"""Write chitchat_reply.json: an offline lm-eval multiple-choice task over the packaged Chit-Chat
conversations. Each example is a message and four candidate replies: the real one and three
replies from other conversations; acc counts how often the model finds the real one most likely.
The examples come from the last conversations of the file, none of which the chat quickstart's
seeded sample of chats draws on (checked here).

    python configs/chat/lm_eval/make_chitchat_reply.py   # then:
    melora-lit evaluate --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt \
        --tasks chitchat_reply --include_path configs/chat/lm_eval
"""

import json
import random
from pathlib import Path

import torch
import yaml

from melora_lit.data.chat import chitchat_conversations

here = Path(__file__).parent
quickstart = yaml.safe_load((here.parent / "quickstart.yaml").read_text())["data"]["init_args"]
chats = list(chitchat_conversations(quickstart["max_messages"]))
# the chats the quickstart samples (ChitChatConversationsDataModule._read_train) are left out
g = torch.Generator().manual_seed(42)
used = set(torch.randperm(len(chats), generator=g)[: quickstart["max_records"]].tolist())
rng = random.Random(0)
pool = [i for i in range(len(chats) - 400, len(chats)) if i not in used]
replies = [m["content"] for i in pool for m in chats[i]["messages"] if m["role"] == "assistant"]
docs = []
for i in pool[:200]:
    user, reply = chats[i]["messages"][0]["content"], chats[i]["messages"][1]["content"]
    choices = [reply] + rng.sample([r for r in replies if r != reply], 3)
    rng.shuffle(choices)
    docs.append({"message": user, "choices": choices, "gold": choices.index(reply)})
(here / "chitchat_reply.json").write_text(json.dumps(docs, indent=0))
print(f"wrote {len(docs)} examples to {here / 'chitchat_reply.json'}")
