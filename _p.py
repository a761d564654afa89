import numpy as np, time, sys
from refimpl.data import hierarchical_points
from refimpl.index.sgtree import SGTree
from refimpl.index.search import preorder
from refimpl.sampling.clustering import suffix_radii
from refimpl.sampling import samplers as S
n=int(float(sys.argv[1]))
X = hierarchical_points(n, 64, rng=n, dtype=np.float32)
rng=np.random.default_rng(0)
Q = X[rng.choice(n,64,replace=False)].astype(np.float64)
Q = Q + 0.1*rng.normal(size=Q.shape)/8; Q/=np.linalg.norm(Q,axis=1,keepdims=True)
tree = SGTree.build(X, rng=1, dtype=np.float32, copy=False)
S.sample_adaptive(tree, Q[:2], 2, beta=20., rng=0)
t=time.process_time(); preorder(tree); suffix_radii(tree); print("precompute s", time.process_time()-t)
for k in (1,10,64):
    t=time.process_time(); r=S.sample_adaptive(tree, Q, k, beta=20., rng=1); dt=time.process_time()-t
    st=r.stats
    print(k, "ms/q %.3f"%(1e3*dt/64), "att/q %.0f"%(st["attempts"].mean()), "ip/q %.0f"%st["inner_products"].mean(), "sel ip %.0f"%st["selection_inner_products"].mean(), "nclust %.0f"%st["n_clusters"].mean())
