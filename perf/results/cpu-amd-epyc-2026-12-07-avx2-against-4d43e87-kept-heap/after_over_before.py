"""After / before per cell (geomean over shapes of eager_native / triton_bn), each pair's ratio, and our own time
after / before. Usage: python after_over_before.py FOLDER (holding before-1, before-2, after-1, after-2)."""
import os
import csv,collections,math,sys
os.chdir(sys.argv[1])
runs=["before-1","before-2","after-1","after-2"]
t=collections.defaultdict(dict)
for run in runs:
    for r in csv.DictReader(open(run+"/results.csv")):
        t[(r["case"],r["dtype"],r["layout"],r["shape"])][(run,r["provider"])]=float(r["ms"])
# per cell (case,dtype,layout): geomean over shapes of speedup (eager/ours) per run
cells=collections.defaultdict(lambda: collections.defaultdict(list))
own=collections.defaultdict(list)
for (case,dt,lay,shape),v in t.items():
    for run in runs:
        cells[(case,dt,lay)][run].append(v[(run,"eager_native")]/v[(run,"triton_bn")])
    ob=min(v[("before-1","triton_bn")],v[("before-2","triton_bn")]); oa=min(v[("after-1","triton_bn")],v[("after-2","triton_bn")])
    own[(case,dt,lay)].append(oa/ob)
g=lambda xs: math.exp(sum(map(math.log,xs))/len(xs))
allr=[]
for k in sorted(cells):
    s={run:g(cells[k][run]) for run in runs}
    r1=s["after-1"]/s["before-1"]; r2=s["after-2"]/s["before-2"]; allr+= [r1,r2]
    print("%-18s %-5s %-13s before %.2f %.2f after %.2f %.2f  ratio %.3f %.3f | own time after/before (best of 2) geomean %.3f" % (*k, s["before-1"],s["before-2"],s["after-1"],s["after-2"],r1,r2,g(own[k])))
print("geomean after/before over cells and pairs: %.3f" % g(allr))
