/* embedded_assets.S — the GPT-2 vocab.json and merges.txt (host/model/assets/) linked into the binary,
 * so kvh_tokenizer_load_embedded and random: models need no files at run time.
 * Owns: the four symbols kvh_asset_{vocab_json,merges_txt}[_end]. Does not own: parsing (tokenizer.c).
 * KVH_ASSET_VOCAB / KVH_ASSET_MERGES are absolute paths set by CMakeLists.txt for this file. */
#ifndef KVH_ASSET_VOCAB
#error "KVH_ASSET_VOCAB (absolute path of host/model/assets/vocab.json) must be defined"
#endif
#ifndef KVH_ASSET_MERGES
#error "KVH_ASSET_MERGES (absolute path of host/model/assets/merges.txt) must be defined"
#endif

    .section .rodata.kvh_assets, "a"
    .balign 16
    .globl kvh_asset_vocab_json
    .globl kvh_asset_vocab_json_end
kvh_asset_vocab_json:
    .incbin KVH_ASSET_VOCAB
kvh_asset_vocab_json_end:
    .byte 0

    .balign 16
    .globl kvh_asset_merges_txt
    .globl kvh_asset_merges_txt_end
kvh_asset_merges_txt:
    .incbin KVH_ASSET_MERGES
kvh_asset_merges_txt_end:
    .byte 0

    .section .note.GNU-stack, "", @progbits
