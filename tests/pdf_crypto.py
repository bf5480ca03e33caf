"""An RC4-encrypted PDF (standard security handler, revision 2) for password tests: no tool needed."""

from __future__ import annotations

import hashlib

PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(text: str, user_password: str, owner_password: str = "owner") -> bytes:
    def padded(pw: str) -> bytes:
        return (pw.encode("latin-1") + PAD)[:32]

    file_id = hashlib.md5(text.encode()).digest()
    perms = -4
    o_value = rc4(hashlib.md5(padded(owner_password)).digest()[:5], padded(user_password))
    key = hashlib.md5(padded(user_password) + o_value + perms.to_bytes(4, "little", signed=True) + file_id).digest()[:5]
    u_value = rc4(key, PAD)

    def encrypt(obj_num: int, data: bytes) -> bytes:
        obj_key = hashlib.md5(key + obj_num.to_bytes(3, "little") + b"\0\0").digest()[:10]
        return rc4(obj_key, data)

    stream = encrypt(4, f"BT /F1 24 Tf 72 700 Td ({text}) Tj ET".encode())
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [5 0 R] /Count 1 >>",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 3 0 R >> >> >>",
            b"<< /Filter /Standard /V 1 /R 2 /O <" + o_value.hex().encode() + b"> /U <" + u_value.hex().encode()
            + b"> /P " + str(perms).encode() + b" >>"]
    out, offsets = b"%PDF-1.4\n", []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    ident = file_id.hex().encode()
    out += (b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 6 0 R /ID [<" % (len(objs) + 1) + ident + b"><" + ident
            + b">] >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out
