# Prototype (an analysis beside the data, not astra-sim): one exclusive GPU shared by every worker, FIFO by readiness, a switch
# cost when the GPU passes to another worker; uncontended op durations = the worker's trace ops
# scaled so that its total is the profile's share alone.
# Usage: mkdir T && tar xzf traces.tar.gz -C T && python3 shared_gpu_prototype.py T
import json, sys, heapq
def simulate(trace, share_ms, switch, alpha=0.05, mbps=100*1448/1514):
    progs = json.load(open(trace))['runs'][0]['programs']
    n = len(progs)
    scale = [share_ms / sum(o['ms'] for o in p if o['op'] == 'compute') for p in progs]
    finish = [dict() for _ in range(n)]
    arrived = {}  # tag -> time
    pc = [0]*n
    gpu_free, owner = 0.0, None
    def ready(d, o): return max([finish[d][j] for j in o['deps']] + [0.0])
    while any(pc[d] < len(progs[d]) for d in range(n)):
        progressed = True
        while progressed:
            progressed = False
            for d in range(n):
                while pc[d] < len(progs[d]) and progs[d][pc[d]]['op'] == 'send':
                    o = progs[d][pc[d]]
                    src = int(o['tag'].split()[2].split('->')[0])
                    if src == d:
                        end = ready(d, o) + alpha + o['bits'] / (mbps * 1048.576)
                        arrived[o['tag']] = end; finish[d][o['id']] = ready(d, o)
                    else:
                        if o['tag'] not in arrived: break
                        finish[d][o['id']] = max(ready(d, o), arrived[o['tag']])
                    pc[d] += 1; progressed = True
        # the compute op that can start first gets the GPU
        cands = []
        for d in range(n):
            if pc[d] < len(progs[d]) and progs[d][pc[d]]['op'] == 'compute':
                o = progs[d][pc[d]]
                if all(j in finish[d] for j in o['deps']):
                    cands.append((ready(d, o), d))
        if not cands:
            if all(pc[d] >= len(progs[d]) for d in range(n)): break
            raise SystemExit('deadlock')
        r, d = min(cands)
        o = progs[d][pc[d]]
        start = max(r, gpu_free) + (switch if owner not in (None, d) else 0.0)
        gpu_free = start + o['ms'] * scale[d]; owner = d
        finish[d][o['id']] = gpu_free; pc[d] += 1
    return max(max(f.values()) for f in finish)
if __name__ == '__main__':
    runs = {'t1024-n4-r100-g1': (10.32, 60.3), 't1024-n4-r100-g16': (9.83, 63.5),
            'gpt2-t1024-n4-r100-g1': (10.54, 44.9), 'gpt2-t1024-n4-r100-g16': (12.16, 45.8)}
    for s in [0.0, 0.1, 0.2, 0.3, 0.4]:
        print(s, {k: f"{simulate(f'{sys.argv[1]}/{k}.trace.json', v[0], s):.1f} vs {v[1]}" for k, v in runs.items()})
