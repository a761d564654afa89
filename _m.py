import numpy as np, time, sys
from refimpl.data import hierarchical_points
from refimpl.index.sgtree import SGTree
from refimpl.sampling import samplers as S
n=int(float(sys.argv[1]))
X = hierarchical_points(n+64, 64, rng=n, dtype=np.float32)
Q = X[n:].astype(np.float64); X = X[:n]
rng=np.random.default_rng(0)
Q = Q + 0.1*rng.normal(size=Q.shape)/8; Q/=np.linalg.norm(Q,axis=1,keepdims=True)
t=time.process_time(); tree = SGTree.build(X, rng=1, dtype=np.float32); print("build", time.process_time()-t)
S.sample_flat_rejection(tree, Q[:2], 2, beta=20., rng=0); S.sample_rejection(tree, Q[:2], 2, beta=20., rng=0)
for k in (10,64):
  for f in (S.sample_flat_rejection, S.sample_rejection):
    t=time.process_time(); r=f(tree, Q, k, beta=20., rng=1); dt=time.process_time()-t
    st=r.stats
    print(f.__name__, k, "ms/q %.2f"%(1e3*dt/64), "att/draw %.0f"%(st["attempts"].mean()/k), "ip/q %.0f"%st["inner_products"].mean(), "sel ip %.0f"%st["selection_inner_products"].mean(), "nclust %.0f"%st["n_clusters"].mean(), "us/att %.3f"%(1e6*dt/st["attempts"].sum()), "fallbacks", st["exact_fallbacks"].sum())
S.sample_adaptive(tree, Q[:2], 2, beta=20., rng=0)
for k in (10,64):
    f=S.sample_adaptive
    t=time.process_time(); r=f(tree, Q, k, beta=20., rng=1); dt=time.process_time()-t
    st=r.stats
    print(f.__name__, k, "ms/q %.2f"%(1e3*dt/64), "att/draw %.1f"%(st["attempts"].mean()/k), "ip/q %.0f"%st["inner_products"].mean(), "sel ip %.0f"%st["selection_inner_products"].mean(), "nclust %.0f"%st["n_clusters"].mean(), "us/att %.3f"%(1e6*dt/st["attempts"].sum()), "fallbacks", st["exact_fallbacks"].sum())
