"""Data readers: images (Fashion-MNIST idx files, .npz, image folders), parallel text and its
tokenizer, and the Bible verse pairs of the SWORD modules."""
