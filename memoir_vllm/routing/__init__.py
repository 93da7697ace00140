"""How a request finds its edit: TopHash masks (tophash) and their bit-packed index (index), the subject gate
(subjects: automatic subjects, the Aho–Corasick gate), and the subject rule's second stage (answer_type: the kind
of answer a question asks for; encoder: the sentence encoder's cosine). ResidualMemory (memoir_vllm.memory)
combines them; the vLLM plugin routes with the same functions (memoir_vllm.vllm.routing)."""
