"""``vllm-seqroute demo``: a small MoE checkpoint built once on local files
(:mod:`.checkpoint`), served with SeqTopK and the HTTP layer, sample requests with several
policies, then the dashboard URL and ready-to-paste examples (:mod:`.cli`)."""
