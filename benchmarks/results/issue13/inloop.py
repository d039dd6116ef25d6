import json, sys, numpy as np
for d in sys.argv[1:]:
    rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    rs = np.array([np.nan if r.get("repair_success") is None else r["repair_success"] for r in rows], float)
    nf = np.array([r.get("correct_n_failed") or 0 for r in rows], float)
    acc = np.array([r["accuracy"] for r in rows], float)
    st = np.arange(1, len(rows) + 1); ok = ~np.isnan(rs) & (nf > 0)
    b, a = np.polyfit(st[ok], rs[ok], 1, w=np.sqrt(nf[ok]))
    ntr = np.mean([r.get("n_repair_trained") or 0 for r in rows])
    print(f"{d}: step1 {rs[0]:.3f} | mean 16-25 {np.nanmean(rs[15:25]):.3f} | slope {b:+.4f}/step (weighted by sqrt failures) | fit@25 {a+25*b:.2f} | failures/step {nf.mean():.1f} | J_rep rows/step {ntr:.1f} | accuracy 1-5 {acc[:5].mean():.2f} 21-25 {acc[20:25].mean():.2f}")
