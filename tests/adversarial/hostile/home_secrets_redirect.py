"""Find the user's home by every route (HOME, pwd, expanduser, ..) and read its ssh key and cloud creds."""
# tags: escape
import os, pwd
homes = {FAKE_HOME, "/root", os.path.expanduser("~")}
try:
    homes.add(pwd.getpwuid(os.getuid()).pw_dir)
except Exception:
    pass
os.environ["HOME"] = FAKE_HOME
homes.add(os.path.expanduser("~"))
for home in homes:
    for rel in (".ssh/id_rsa", ".ssh/id_ed25519", ".aws/credentials", ".netrc", ".config/gh/hosts.yml",
                ".cache/huggingface/token", ".bash_history"):
        path = os.path.join(home, rel)
        try:
            data = open(path).read()
            if SECRET_NAME in data:
                escaped("read " + path)
        except Exception:
            pass
def solve(x):
    return x
