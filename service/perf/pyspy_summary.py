"""Summarise a py-spy raw profile: self and inclusive share per function.

    python service/perf/pyspy_summary.py profile.txt [how many]
"""
import sys, collections
tot=0; self_c=collections.Counter(); incl=collections.Counter()
for line in open(sys.argv[1]):
    line=line.rstrip()
    if not line: continue
    stack, n = line.rsplit(' ',1); n=int(n); tot+=n
    frames=stack.split(';')
    self_c[frames[-1]]+=n
    seen=set()
    for f in frames:
        key=f.split(' (')[0]+' ('+f.split(' (')[1].split(':')[0].split('/')[-1] if ' (' in f else f
        if key not in seen: incl[key]+=n; seen.add(key)
print("total samples", tot)
print("--- self top")
for k,v in self_c.most_common(25): print(f"{100*v/tot:5.1f}% {k[:150]}")
print("--- inclusive top")
for k,v in incl.most_common(int(sys.argv[2]) if len(sys.argv)>2 else 60): print(f"{100*v/tot:5.1f}% {k[:150]}")
