# Sourced by scripts: fashion_mnist_dir prints a folder holding the four Fashion-MNIST IDX files
# (gzip), getting them if needed: $FASHION_MNIST_DIR, an earlier download in data/fashion-mnist,
# the Debian/Ubuntu package dataset-fashion-mnist (installed when we are root), or the official
# download (MD5-checked against the values the dataset's authors publish).
FMNIST_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
FMNIST_MD5=(8d4fb7e6c68d591d4c3dfef9ec88bf0d 25c81989df183df01b3e8a0aad5dffbe bef4ecab320f06d8554ea6380940ec79 bb300cfdad3c16e7a12a480ee83cd310)
FMNIST_URL=http://fashion-mnist.s3-website.eu-central-1.amazonaws.com

fmnist_complete() { local f; for f in "${FMNIST_FILES[@]}"; do [[ -s $1/$f ]] || return 1; done; }

fashion_mnist_dir() {
  if [[ -n ${FASHION_MNIST_DIR:-} ]]; then
    fmnist_complete "$FASHION_MNIST_DIR" || { echo "FASHION_MNIST_DIR=$FASHION_MNIST_DIR lacks ${FMNIST_FILES[*]}" >&2; return 1; }
    echo "$FASHION_MNIST_DIR"; return
  fi
  local deb=/usr/share/datasets/fashion-mnist local=data/fashion-mnist
  fmnist_complete "$local" && { echo "$local"; return; }
  fmnist_complete "$deb" && { echo "$deb"; return; }
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "getting Fashion-MNIST from the Debian package dataset-fashion-mnist" >&2
    if apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
       { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
      fmnist_complete "$deb" && { echo "$deb"; return; }
    fi
  fi
  echo "downloading Fashion-MNIST from $FMNIST_URL" >&2
  mkdir -p "$local"
  local i f
  for i in "${!FMNIST_FILES[@]}"; do
    f=${FMNIST_FILES[$i]}
    [[ -s $local/$f ]] && [[ $(md5sum <"$local/$f" | cut -d' ' -f1) == "${FMNIST_MD5[$i]}" ]] && continue
    curl -fsSL --retry 3 -C - -o "$local/$f.part" "$FMNIST_URL/$f" || { echo "download of $f failed" >&2; return 1; }
    [[ $(md5sum <"$local/$f.part" | cut -d' ' -f1) == "${FMNIST_MD5[$i]}" ]] || { echo "$f: MD5 mismatch" >&2; rm -f "$local/$f.part"; return 1; }
    mv "$local/$f.part" "$local/$f"
  done
  echo "$local"
}
