"""Stage 2 and evaluation as pure numpy/TF functions: crops, voting, local features, verification, scores, GAP, submission;
retrieval (exact top-k, shard merge, neighbour votes) and optional approximate search (ann, FAISS)."""
