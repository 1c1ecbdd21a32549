import struct, sys, zipfile
# MIT-BIH record 208 excerpt from SciPy's ecg.dat, re-encoded as a WFDB record in
# format 212 (byte-identical to wfdb 4.3.1's wrsamp with the same arguments).
src, out = sys.argv[1], sys.argv[2]
npy = zipfile.ZipFile(src).read('ecg.npy')
assert npy[:8] == b'\x93NUMPY\x01\x00'
hlen = struct.unpack('<H', npy[8:10])[0]
assert b"'descr': '<u2'" in npy[10:10 + hlen]
x = list(struct.unpack('<%dH' % ((len(npy) - 10 - hlen) // 2), npy[10 + hlen:]))
assert len(x) == 108000
if len(x) % 2:
    x.append(0)
dat = bytearray()
for a, b in zip(x[0::2], x[1::2]):
    a &= 0xFFF; b &= 0xFFF
    dat += bytes([a & 0xFF, ((a >> 8) & 0x0F) | ((b >> 4) & 0xF0), b & 0xFF])
checksum = sum(x) & 0xFFFF
checksum = checksum - 0x10000 if checksum >= 0x8000 else checksum
open(out + '.dat', 'wb').write(dat)
open(out + '.hea', 'w').write(
    f"{out} 1 360 108000\n{out}.dat 212 200(1024)/mV 12 0 {x[0]} {checksum} 0 MLII\n"
    "# MIT-BIH record 208, lead MLII, 19:35-24:35 (the excerpt in SciPy 1.11.4 scipy/misc/ecg.dat)\n")
