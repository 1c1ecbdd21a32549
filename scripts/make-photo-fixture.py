"""Writes testdata/zhang_wei_photo.jpg: a small real JPEG (Pillow) carrying the
privacy test's patient in every metadata block a phone or camera writes — EXIF
(Artist, ImageDescription, DateTime, GPS position), XMP (dc:creator), IPTC
(Photoshop APP13, By-line) and a JPEG comment — so the privacy test can check that
none of it reaches a hub. Run with the project venv (scripts/deps/photo-tools.sh):
    target/py-venv/bin/python scripts/make-photo-fixture.py
"""
import struct
import sys
from PIL import Image, ExifTags

out = sys.argv[1] if len(sys.argv) > 1 else "testdata/zhang_wei_photo.jpg"
img = Image.new("RGB", (64, 48))
img.putdata([((x * 4) % 256, (y * 5) % 256, (x * y) % 256) for y in range(48) for x in range(64)])
exif = Image.Exif()
exif[ExifTags.Base.Artist] = "Zhang Wei"
exif[ExifTags.Base.ImageDescription] = "wound photo, Zhang Wei 410102198001011234, born 1980-01-01"
exif[ExifTags.Base.DateTime] = "2026:11:28 09:15:00"
exif[ExifTags.IFD.GPSInfo] = {
    ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (34.0, 27.0, 30.0),
    ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: (113.0, 2.0, 15.0),
}
tmp = out + ".tmp"
img.save(tmp, format="JPEG", quality=90, exif=exif, comment=b"Zhang Wei, bed 4")
raw = open(tmp, "rb").read()


def seg(marker, body):
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body


xmp = seg(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF "
          b"xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description "
          b"xmlns:dc='http://purl.org/dc/elements/1.1/' dc:creator='Zhang Wei'/></rdf:RDF></x:xmpmeta>")
record = b"\x1c\x02\x50" + struct.pack(">H", 9) + b"Zhang Wei"
iptc = seg(0xED, b"Photoshop 3.0\0" + b"8BIM\x04\x04\0\0" + struct.pack(">I", len(record)) + record)
open(out, "wb").write(raw[:2] + xmp + iptc + raw[2:])
import os
os.remove(tmp)
